"""reslab.reproduce"""
