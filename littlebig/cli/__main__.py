from littlebig.cli import main

main()
