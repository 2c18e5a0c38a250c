"""The tiny VLM the demo runs on: the synthetic task, training inputs, the shipped model's accuracy
and the text-only control."""
