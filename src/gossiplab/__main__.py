from gossiplab.cli import main

main()
