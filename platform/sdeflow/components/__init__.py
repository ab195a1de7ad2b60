"""Finding components: the registry (entry-point discovery, plugin metadata) and the argument schemas
read from the factories' typed signatures."""
