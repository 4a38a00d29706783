"""The demo: a small FastAPI app with real culprits, real traffic, and the report it produces."""
