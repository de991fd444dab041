"""Shared by the model owner and the data owner: architectures, bundles, transfer, security, evaluation."""
