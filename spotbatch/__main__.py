from spotbatch.cli import main

main()
