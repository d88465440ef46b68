"""The data plane: worker processes that accept, parse and forward HTTP/1.1."""
