"""Local servers for tests: real sockets on 127.0.0.1, never the internet.

``tests.servers.http`` serves files over HTTP/1.1 with byte ranges, validators, redirects and
injectable faults; import its ``http_server`` fixture into a test module to use it.
"""
