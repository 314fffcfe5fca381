#!/usr/bin/env python
"""Convert checkpoints between Hugging Face format and pipellm pipeline layer files.

    python convert_model.py hg_to_pp --input-path HF_DIR --save-path PP_DIR
    python convert_model.py pp_to_hg --input-path CKPT --save-path HF_OUT [--max-shard-size 5GB]

See ``pipellm.convert.converters`` for the formats and the guarantees.
"""
from pipellm.convert.converters import main

if __name__ == "__main__":
    main()
