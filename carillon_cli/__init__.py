"""The carillon command line: start the services, run the demo, inspect campaigns."""
