"""The ``interposer`` command: embedded stack, demo, mounts and policy control."""
