"""Model weights in and out: training checkpoints, Hugging Face directories, one loader.

`weights` reads and writes safetensors safely, `hf` converts GPT-2 directories of transformers,
`load.load_model` opens whatever a user points at, `native` holds training checkpoints.
"""
