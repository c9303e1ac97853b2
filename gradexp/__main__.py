from gradexp.cli import main

main()
