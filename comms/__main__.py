from comms.cli import main

main()
