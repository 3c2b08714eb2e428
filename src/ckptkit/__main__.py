from ckptkit.cli.main import main

main()
