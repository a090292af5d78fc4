"""`gpt2lab serve`: an OpenAI-compatible HTTP API and a web playground over one model.

engine.py schedules requests into one continuously batched decode loop (over
`gpt2lab.batching.SlotCache`); protocol.py validates OpenAI requests and shapes responses;
app.py holds the Starlette routes and the uvicorn server; static/ is the playground.
"""
