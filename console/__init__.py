"""graft-console: the model repository and the servers' live state in a browser (Flask, under waitress)."""
