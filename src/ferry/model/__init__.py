"""Ferry's data model: frozen dataclasses and enums; only the standard library."""
