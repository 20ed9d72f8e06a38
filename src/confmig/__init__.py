"""confmig: live migration of confidential virtual machines."""
