"""The engine: sequences, the continuous-batching scheduler and token streaming, on its own thread."""
