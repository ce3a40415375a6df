"""RabbitMQ fixtures: a placeholder, to be filled in by the broker work."""
