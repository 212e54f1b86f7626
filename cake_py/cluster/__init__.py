"""The cluster: pipeline stages (local or remote), topology and placement."""
