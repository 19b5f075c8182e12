"""The chassis shared by every Carillon service.

Server bootstrap (health, reflection, interceptors, graceful shutdown), typed settings, database
engines and migrations, structured logging, the error hierarchy and its mapping to gRPC statuses,
sandboxes, resource names, pagination and conversions between protobuf values and Python values.
Each service package holds only its own domain on top of this.
"""
