from vramcalc.cli import main

main()
