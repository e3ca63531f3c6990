"""The Raspberry Pi daemon: poll devices, keep every reading in a durable outbox, publish over MQTT."""
