"""All stages from one command: `ray-e5 pipeline` and the offline `ray-e5 quickstart`."""
