"""High availability: placement policy (pure), and later leader election and fencing."""
