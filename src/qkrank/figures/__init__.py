"""One module per figure kind; each is a Snakemake rule input, so editing one redraws only its figure."""
