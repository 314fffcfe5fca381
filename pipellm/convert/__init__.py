"""Hugging Face checkpoints <-> pipeline layer files (``convert_model.py hg_to_pp | pp_to_hg``)."""
