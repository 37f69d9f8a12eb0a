"""Example apps built on aikit, written the way a user writes them (see README: "Add your own metered endpoint")."""
