"""Visual grounding with VG-LAW: a command's language-adaptive weights drive a ViT that finds the target's
box and mask (text.py, model.py, pipeline.py, data.py, train.py, evaluate.py, metrics.py, cli.py)."""
