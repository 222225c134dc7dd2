"""The node agent: one asyncio daemon per node that makes the node match the store."""
