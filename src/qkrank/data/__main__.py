from qkrank.data.cli import main

main()
