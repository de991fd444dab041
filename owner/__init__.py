"""The model owner's side: daemon, emulator builders, adapter registry, plug-in, serving."""
