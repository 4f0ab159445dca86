"""reslab.transfer"""
