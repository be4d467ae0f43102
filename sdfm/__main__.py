from sdfm.cli import main

main()
