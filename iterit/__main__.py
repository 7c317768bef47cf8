from iterit.cli import main

main()
