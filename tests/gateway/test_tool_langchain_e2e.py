"""langchain-openai against the real stack, as an agent framework uses it: bind_tools with a
named or "any" tool choice gives tool calls whose arguments validate, bind_tools with auto an
AIMessage, and with_structured_output returns parsed objects for each of its methods."""

from __future__ import annotations

from typing import Literal

import jsonschema
import pytest
from langchain_core.messages import AIMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoTokenizer

from tests.gateway.tool_examples import SCHEMAS, TOOLS

pytestmark = pytest.mark.slow

QUESTION = "What is the weather in Oslo?"


class Forecast(BaseModel):
    """A weather forecast."""

    model_config = ConfigDict(extra="forbid")
    city: Literal["Paris", "Oslo", "Lima"]
    days: int = Field(ge=1, le=7)


@pytest.fixture(scope="module")
def llm(gateway, gateway_model_dir) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=f"{gateway.url}/v1",
        api_key=gateway.api_key or "none",
        model=gateway_model_dir.name,
        temperature=1,
        max_tokens=120,
        max_retries=0,
        timeout=120,
    )


@pytest.mark.parametrize("tool_choice", ["get_weather", "any"])
def test_bind_tools_forced_returns_valid_tool_calls(llm, tool_choice):
    msg = llm.bind_tools(TOOLS, tool_choice=tool_choice, parallel_tool_calls=False).invoke(QUESTION)
    assert isinstance(msg, AIMessage) and msg.tool_calls and not msg.invalid_tool_calls
    for call in msg.tool_calls:
        assert call["id"].startswith("chatcmpl-tool-")
        assert tool_choice == "any" or call["name"] == "get_weather"
        jsonschema.validate(call["args"], SCHEMAS[call["name"]])


def test_bind_tools_auto_returns_a_message(llm):
    msg = llm.bind_tools(TOOLS).invoke(QUESTION, max_tokens=16)
    assert isinstance(msg, AIMessage) and isinstance(msg.content, str)


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_structured_output_parses_into_the_model(llm, method):
    got = llm.with_structured_output(Forecast, method=method).invoke(QUESTION)
    assert isinstance(got, Forecast) and 1 <= got.days <= 7


def test_structured_output_json_mode_returns_a_dict(llm, gateway_model_dir):
    # json_object leaves keys free, and a random model rarely closes a free string
    # (docs/http_api.md): its object would run to max_tokens. A bias towards "}" lets it
    # close; the grammar still decides where "}" may go (nowhere inside a key).
    close = AutoTokenizer.from_pretrained(gateway_model_dir).convert_tokens_to_ids("}")
    schema = {"title": "forecast", "type": "object", "properties": {"city": {"type": "string"}}}
    got = llm.with_structured_output(schema, method="json_mode").invoke(
        QUESTION + " Answer in JSON.", max_tokens=400, logit_bias={str(close): 10}
    )
    assert isinstance(got, dict)
