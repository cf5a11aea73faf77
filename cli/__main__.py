from gpconv_cli.main import main

main()
