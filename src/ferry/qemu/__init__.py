"""QEMU: command lines (pure), processes, and the QMP monitor."""
