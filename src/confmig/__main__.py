from confmig.cli.main import main

main()
