"""The data owner's side: CLI, local training on the emulator, evaluation."""
