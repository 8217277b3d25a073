#!/usr/bin/env python
"""Convert a megamoe checkpoint to a Hugging Face model directory (or back).

Same arguments as ``megamoe convert`` (see megamoe/checkpoint/convert_cmd.py), e.g.

    python tools/convert_to_hf.py runs/step1000 hf_out --format auto
    python tools/convert_to_hf.py some_mixtral_dir megamoe_dir --direction from-hf
"""
import sys

from megamoe.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
