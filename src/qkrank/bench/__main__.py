from qkrank.bench.cli import main

main()
