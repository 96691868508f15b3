"""gradshard: serverless federated learning whose aggregation is sharded across memory-capped functions."""

__version__ = "0.1.0"
