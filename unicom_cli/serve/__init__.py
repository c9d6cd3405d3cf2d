"""`unicom serve`: an HTTP search service and a web page over an index (FastAPI + uvicorn)."""
