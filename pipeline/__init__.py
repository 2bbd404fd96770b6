"""wetstone: CommonCrawl WET files to a trained, post-trained, evaluated and served GPT.

Every stage lives in a module of this package and runs by hand as `python -m pipeline <stage>`;
Snakemake rules (rules/*.smk) only wire those commands together.
"""

__version__ = "0.1.0"
