from snapfs.cli import main

main()
