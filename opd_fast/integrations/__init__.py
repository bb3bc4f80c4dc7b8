"""The fused losses inside other trainers: Hugging Face models and loops (``hf``), TRL's trainers (``trl``)."""
