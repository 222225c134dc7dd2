"""The virtual switch (a bridge of the same name on every node) and VM taps."""
