"""Conveyor's command line: `python -m conveyor run` starts the whole system locally;
`python -m conveyor status` shows the queue and the workers from Redis."""
